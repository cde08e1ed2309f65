"""The ST2SI model: item text and tokenisation (`text`), samples and their batches (`samples`), and the
module itself, backbone + item linear projection (`st2si`). Importing this package imports no torch."""
