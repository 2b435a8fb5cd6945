"""The sandbox engine: namespaces, the filesystem layout, init, the spawner, caps."""
