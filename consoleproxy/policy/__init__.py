"""Policy: pure decisions over values, tested without sockets.

tokens and cloudstack (our JWE and CloudStack/Mold's console tokens; keyfiles their key files),
targets (allowed VNC targets), origin (the Origin rule), sessions (the registry and its limits),
replay (single use: the stores), resume (resume tickets), readiness (/readyz), outcome (how a
console ended), acme_policy (when and what to order), gates (the accept layer's counters, rate
buckets and request-head scan).
"""
