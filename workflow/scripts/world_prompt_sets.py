from _job import start

start(snakemake)
from drpo.prompt_files import read_rows
from drpo.world.prompt_sets import write_parti_tsv, write_pickapic_shards

rows = read_rows(snakemake.input.test)
write_parti_tsv(rows, snakemake.output.parti)
write_pickapic_shards(rows, snakemake.output.pickapic)
