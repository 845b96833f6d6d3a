# File descriptors, one module per kind (like CRIU's files-*.c with their ops structs).
# Each kind module defines an ops object with a dump half and a restore half; FILE_KINDS
# is the one table the dumper and the restorer consult. Adding a kind: one module, one
# line here, one message in proto/, one test.
