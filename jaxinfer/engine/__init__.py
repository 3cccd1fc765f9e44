"""The engine: build configuration, ahead-of-time compilation, engine directories, and the
request loop that ties the scheduler to the compiled model step."""
