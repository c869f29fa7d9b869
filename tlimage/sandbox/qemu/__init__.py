"""QEMU `-M microvm` machinery, shared by the build executor (tlimage/executor/microvm.py: one
step per VM) and the sandbox runtime (tlimage/runtime/microvm.py: a VM kept alive).

    provision.py  the guest kit: kernel + initramfs with the agent (runner/), built from apt
    disks.py      ext4 images of layers (cached), flattened images, the scratch disk
    process.py    QEMU's command line and process lifetime (`VM`: boot, request, shutdown)
    protocol.py   the agent's wire format (runner/PROTOCOL.md)
    channel.py    frames over the virtio-serial socket; the EXPORT tar unpacked on the host
    qmp.py        QEMU's monitor: quit, query-kvm, stop/cont, migrate
    kvm.py        whether KVM works: a boot probe, cached per host, QEMU and guest kit
    shim.py       the supervisor process of one sandbox VM (`python -m tlimage.sandbox.qemu.shim`)
"""
