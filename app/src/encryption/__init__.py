"""Cryptography: certificates, secret encryption, password hashing, TOTP, signatures."""
