"""fastweedout: fast population scoring and Random Search (Weedout) for sparse Wide ResNets."""

from fastweedout.config import (
    DataConfig,
    ModelConfig,
    PruneConfig,
    RunConfig,
    SearchConfig,
    ThroughoutConfig,
    TrainConfig,
)
from fastweedout.cost.flops import forward_flops, train_step_flops, useful_flops
from fastweedout.data.datasets import Dataset, DatasetError, SyntheticConfig, load_dataset
from fastweedout.engines.registry import scoring_flops
from fastweedout.engines.scoring import score_population, score_weight_population
from fastweedout.masks import Masks, layer_sparsities, sample_masks
from fastweedout.model.masked import MaskedNet, WeightMaskedNet, weight_sets
from fastweedout.model.wrn import WideResNet, create_model, list_models
from fastweedout.search.prune_init import prune_at_init
from fastweedout.search.weedout import SearchResult, random_mask, random_search
from fastweedout.spaces.weight import check_weight_masks, member_weights, sample_weight_masks
from fastweedout.training.loop import TrainingDiverged, TrainResult, train
from fastweedout.world import World

__all__ = [
    "WideResNet", "create_model", "list_models", "Masks", "sample_masks", "layer_sparsities",
    "score_population", "random_search", "random_mask", "SearchResult", "SearchConfig",
    "forward_flops", "train_step_flops", "useful_flops", "scoring_flops",
    "load_dataset", "Dataset", "DatasetError", "SyntheticConfig",
    "TrainConfig", "TrainResult", "TrainingDiverged", "train", "World",
    "DataConfig", "ModelConfig", "PruneConfig", "RunConfig", "ThroughoutConfig",
    "prune_at_init", "MaskedNet",
    # weight-level (unstructured) masks
    "weight_sets", "sample_weight_masks", "check_weight_masks", "member_weights", "score_weight_population",
    "WeightMaskedNet",
]
__version__ = "0.2.0"
