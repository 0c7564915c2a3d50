import json
from pathlib import Path

from _job import start

start(snakemake)
from drpo.assets import check_assets, required_assets

check_assets(snakemake.params.config)
assets = [{"path": a.path, "what": a.what} for a in required_assets(snakemake.params.config)]
Path(snakemake.output[0]).write_text(json.dumps(assets, indent=2) + "\n")
print(f"all {len(assets)} model files present")
