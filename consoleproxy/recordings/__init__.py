"""Console recording: recording_policy (what is recorded), recording (the relay's hook and the
manager), recording_format (the file format), recording_writer (the writer thread),
recording_store and recording_s3 (local and S3-compatible storage).
"""
