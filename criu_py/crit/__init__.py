# crit: decode, encode, show and explore CRIU-format images. Kept import-light.
