"""The forward engine, below every stage: `cost` (the FLOP model and work counts) < `forward`
(capturing a window, walking the blocks, the LM head's NLL) < `head_bound` (the certified
lower bound on a candidate's NLL from a few head columns). The search, compression,
compensation and the evaluations import it; it imports none of them."""
