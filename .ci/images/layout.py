"""Write a root filesystem tree as an OCI image layout: one gzip layer (owners, modes, links and
device-free, as `docker export` would), a config that starts redis-server, index.json tagged
`latest`.  Usage: layout.py TREE OUT"""

import gzip
import hashlib
import json
import os
import sys
import tarfile

tree, out = sys.argv[1], sys.argv[2]
os.makedirs(f"{out}/blobs/sha256")


def blob(data: bytes) -> dict:
    digest = hashlib.sha256(data).hexdigest()
    with open(f"{out}/blobs/sha256/{digest}", "wb") as f:
        f.write(data)
    return {"digest": f"sha256:{digest}", "size": len(data)}


def skip(info: tarfile.TarInfo):
    top = info.name.split("/")[1] if "/" in info.name else ""
    if top in ("proc", "sys", "dev") and info.name.count("/") > 1:
        return None  # the mount points stay, their contents go
    return None if info.isdev() or info.isfifo() else info


plain = f"{out}/layer.tar"
with tarfile.open(plain, "w", format=tarfile.PAX_FORMAT) as tar:
    tar.add(tree, arcname=".", filter=skip)
diff_id = hashlib.sha256()
with open(plain, "rb") as source, gzip.GzipFile(plain + ".gz", "wb", mtime=0) as gz:
    while block := source.read(1 << 20):
        diff_id.update(block)
        gz.write(block)
os.unlink(plain)
with open(plain + ".gz", "rb") as f:
    layer = f.read()
os.unlink(plain + ".gz")
config = json.dumps({
    "architecture": "amd64", "os": "linux",
    "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
               "Cmd": ["redis-server", "--port", "6379", "--protected-mode", "no", "--save", ""],
               "ExposedPorts": {"6379/tcp": {}}, "WorkingDir": "/var/lib/redis", "User": "redis"},
    "rootfs": {"type": "layers", "diff_ids": [f"sha256:{diff_id.hexdigest()}"]},
}).encode()
manifest = json.dumps({
    "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
    "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **blob(config)},
    "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", **blob(layer)}],
}).encode()
index = {"schemaVersion": 2, "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                                             **blob(manifest),
                                             "annotations": {"org.opencontainers.image.ref.name": "latest"}}]}
with open(f"{out}/index.json", "w") as f:
    json.dump(index, f)
with open(f"{out}/oci-layout", "w") as f:
    f.write('{"imageLayoutVersion": "1.0.0"}')
