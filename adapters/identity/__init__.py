"""Identity adapters: what node attestation asks of a cloud (instance tags)."""
