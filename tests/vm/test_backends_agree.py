"""The same image built through the QEMU microVM (TCG or KVM) and through the namespace sandbox
gives byte-identical layers: what a step changed does not depend on where it ran."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tlimage.builder import build_image

pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(os.geteuid() != 0, reason="both backends need root"),
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None,
                       reason="qemu-system-x86 is not installed (scripts/setup.sh installs it)"),
]  # fmt: skip

IMAGE = """\
from tlimage import Image

image = (
    Image("agree", base_image="busybox")
    .run("mkdir -p /w/sub && echo hi > /w/x && ln -s x /w/link && chmod 0750 /w/sub")
    .copy("app/", "/srv/app/")
    .workdir("/srv/app")
    .run("rm -rf /w/sub && rm /etc/group && echo again >> /w/x && touch new.txt")
    .run("mkdir -p /w/sub && echo fresh > /w/sub/f")
)
"""


def test_microvm_and_namespace_layers_are_identical(tmp_path: Path) -> None:
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "a.txt").write_text("a\n")
    (tmp_path / "image.py").write_text(IMAGE)
    results = {}
    for isolation in ("namespace", "microvm"):
        results[isolation] = build_image(
            tmp_path / "image.py",
            isolation=isolation,
            cache_dir=tmp_path / f"cache-{isolation}",
            project=isolation,
        )
    ns, vm = results["namespace"], results["microvm"]
    assert ns.executed_steps == vm.executed_steps == 5
    assert [la.diff_id for la in ns.manifest.layers] == [la.diff_id for la in vm.manifest.layers]
    assert ns.image_id == vm.image_id
