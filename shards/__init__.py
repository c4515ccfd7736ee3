"""Writing datasets into WebDataset tar shards: `python -m shards.make` (or shards.make.build; the
launchers call shards.make.ensure, which builds a config's shards on first use).

The format both sides share (constants, manifest location, DataError) is ssl_ebm.shard_format; this
package imports ssl_ebm, never the other way round.

    sources.py  one reader per public file format -> a Source (examples and labels by part)
    text.py     bag-of-words vocabulary and counts, or sentence embeddings
    make.py     the split protocols, encoding, the shard writer and the manifest; ensure
    bench.py    read + decode throughput of shards through ssl_ebm.data
"""
