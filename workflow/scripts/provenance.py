from pathlib import Path

from _log import redirect

redirect(snakemake)
from drpo.provenance import write_provenance

write_provenance(Path(snakemake.output.config).parent, snakemake.config)
