"""Names shared by every stage: GGUF metadata keys windq writes, and the files of a calibration
folder. Constants in nested classes, the way gguf-py's `Keys` are."""


class Keys:
    class Align:
        # weights that are not alignment padding: bits per weight count only these
        REAL_WEIGHTS = "windq.align.real_weights"
        ORIGINAL_WIDTH = "windq.align.original_embedding_length"

    class Twin:
        # "tensor=TYPE" for every tensor of a rewritten model (aligned, FFN-split), the type its data
        # had in the source: the twin is F32, but a plan that gives a tensor its source's type can
        # reproduce it at (nearly) zero error, so --exclude-source must know the source's types
        SOURCE_TYPES = "windq.twin.source_types"

    class Split:
        SALIENT = "windq.split.salient"  # neurons in each FFN's first group (the shared expert)
        # per layer, the source FFN's neuron indices in the order the split model holds them
        NEURONS = "windq.split.neurons.{layer}"


class CalibrationFiles:
    """What `windq calibrate --out DIR` writes into DIR."""

    IMATRIX = "imatrix.gguf"  # llama-imatrix's GGUF format
    ACTIVATIONS = "activations.npz"  # per-column mean |x| and max |x|, keys "tensor|statistic"
    TOKENS = "tokens.npy"  # the calibration tokens, chunks × ctx
    JUDGE_TOKENS = "judge-tokens.npy"  # held-in chunks after those, kept out of the imatrix and Fisher
    FISHER = "fisher.npz"  # diagonal Fisher marginals, keys "tensor|rows" and "tensor|cols"
    META = "calibration.json"
