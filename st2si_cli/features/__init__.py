"""Query features of a frozen backbone: `forward.py` runs samples through the ST2SI module in batches
(the one batched forward); `cache.py` keeps every position's features of a dataset in the zoo, so head
training becomes epochs over a matrix."""
