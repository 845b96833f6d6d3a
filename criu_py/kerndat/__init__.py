# Kernel feature probes ("kdat") and their cache file. Kept import-light: the CLI imports it.
