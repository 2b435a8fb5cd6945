"""Where this checkout has Alpine's minirootfs beside it (../shared/alpine-mirror, as on machines
without network), the examples use that tarball; everywhere else they leave the rootfs at its
default, `alpine`, which the plugin downloads once and checks against the digest it pins.

Your project needs no such file: set `nsbox_rootfs` in its ini file, or `NSBOX_ROOTFS`, only to use
a rootfs of your own.
"""

import os
import pathlib

LOCAL_ALPINE = (pathlib.Path(__file__).resolve().parents[2] / "shared" / "alpine-mirror"
                / "v3.20/releases/x86_64/alpine-minirootfs-3.20.3-x86_64.tar.gz")

# At import, before the plugin reads its settings; a rootfs given on the command line or in the
# environment still wins.
if LOCAL_ALPINE.is_file():
    os.environ.setdefault("NSBOX_ROOTFS", str(LOCAL_ALPINE))
