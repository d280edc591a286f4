"""One module per package kind: what gpuwheel knows about building it."""
