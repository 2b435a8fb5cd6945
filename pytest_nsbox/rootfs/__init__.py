"""The rootfs store: specs, downloads, archive checks, the content-addressed cache."""
