"""The data-tools image: pandas, pyarrow and Jupyter on the debian-minimal base."""

from tensorlake.applications import Image, function

image = (
    Image(name="data-tools")
    .run("pip install pandas pyarrow jupyter")
    .run("mkdir -p /workspace/cache")
    .env("APP_ENV", "prod")
)


@function(image=image)
def analyze(path: str) -> int:
    import pandas as pd

    return len(pd.read_parquet(path))
