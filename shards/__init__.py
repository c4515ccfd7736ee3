"""Writing datasets into WebDataset tar shards: `python -m shards.make` (or shards.make.build).

    sources.py  one reader per public file format -> a Source (examples and labels by part)
    text.py     bag-of-words vocabulary and counts, or sentence embeddings
    make.py     the split protocols, encoding, the shard writer and the manifest
    bench.py    read + decode throughput of shards through ssl_ebm.data
"""
