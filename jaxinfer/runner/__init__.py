"""The model runner: shape buckets, host-side batch building, the compiled step and in-graph sampling."""
