"""The userspace router between vassal tun devices and the host."""
