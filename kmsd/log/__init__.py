"""The durable command log that every mutation of the key store goes through."""
