"""TLS certificates: parsing, checks, the store and how certificates get there.

certpem (PEM parsing and repair), certchain (items and chain verification), certsni (SNI
contexts), certstore (the on-disk store), certstate (what the listeners serve, swapped live),
devcert (the development CA and certificate), acme_orders (ACME orders and renewal).
"""
