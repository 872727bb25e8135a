"""Who may do what: identities from mutual TLS, key policies, grants, rate limits."""
