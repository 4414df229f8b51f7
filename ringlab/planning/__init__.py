"""Planning, above the engine: measure memory (memory), model it term by term (memory_model),
say what a run needs (planner) and how ring, Ulysses and hybrid compare (strategies), and run one rank's engine code at full scale on meta tensors
(dryrun). Imports torch and the engine."""
