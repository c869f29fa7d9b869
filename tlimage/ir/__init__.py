"""The build-step IR: every front end compiles to this; the builder consumes only this."""

from tlimage.ir.codec import IR_VERSION, canonical, from_obj, step_from_obj, step_to_obj, to_obj
from tlimage.ir.graph import ImageDef, Stage, StepMeta, step_digest
from tlimage.ir.steps import (
    MOUNT_TYPES,
    STEP_TYPES,
    Add,
    Arg,
    BindMount,
    CacheMount,
    Cmd,
    Copy,
    Entrypoint,
    Env,
    Expose,
    From,
    Healthcheck,
    InlineFile,
    Label,
    Mount,
    Onbuild,
    Run,
    SecretMount,
    Shell,
    SshMount,
    Step,
    StopSignal,
    TmpfsMount,
    User,
    Volume,
    Workdir,
)
from tlimage.ir.text import format_text, parse_text, to_json_obj

__all__ = [
    "IR_VERSION", "MOUNT_TYPES", "STEP_TYPES", "Add", "Arg", "BindMount", "CacheMount", "Cmd",
    "Copy", "Entrypoint", "Env", "Expose", "From", "Healthcheck", "ImageDef", "InlineFile",
    "Label", "Mount", "Onbuild", "Run", "SecretMount", "Shell", "SshMount", "Stage", "Step",
    "StepMeta", "StopSignal", "TmpfsMount", "User", "Volume", "Workdir", "canonical",
    "format_text", "from_obj", "parse_text", "step_digest", "step_from_obj", "step_to_obj",
    "to_json_obj", "to_obj",
]  # fmt: skip
