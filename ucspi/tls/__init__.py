"""sslserver: TLS for UCSPI programs (issue 14; the design is in README's sslserver section)."""
