"""The Llama-family model: config, pure forward pass, and sharding rules."""
