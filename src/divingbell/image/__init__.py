"""Boot images built from Debian packages: the network-boot discovery image (kernel + initramfs)."""
