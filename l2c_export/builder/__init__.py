"""From schedule to build folder: export every subset, build its engine, write the manifest, swap the folder in
atomically."""
