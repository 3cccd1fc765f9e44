"""The device side of the paged KV cache: pool arrays, cache writes, memory planning, attention metadata."""
