"""I/O at the edges: slide readers, zarr stores, GeoJSON. The only place OpenSlide's (x, y) order appears."""
