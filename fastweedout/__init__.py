"""fastweedout: fast population scoring and Random Search (Weedout) for sparse Wide ResNets."""

from .config import DataConfig, ModelConfig, PruneConfig, RunConfig, SearchConfig, ThroughoutConfig, TrainConfig
from .datasets import Dataset, DatasetError, SyntheticConfig, load_dataset
from .flops import forward_flops, scoring_flops, train_step_flops, useful_flops
from .masks import Masks, layer_sparsities, sample_masks
from .model import WideResNet, create_model, list_models
from .scoring import score_population
from .search import SearchResult, random_mask, random_search
from .training import TrainingDiverged, TrainResult, train
from .world import World

__all__ = [
    "WideResNet", "create_model", "list_models", "Masks", "sample_masks", "layer_sparsities",
    "score_population", "random_search", "random_mask", "SearchResult", "SearchConfig",
    "forward_flops", "train_step_flops", "useful_flops", "scoring_flops",
    "load_dataset", "Dataset", "DatasetError", "SyntheticConfig",
    "TrainConfig", "TrainResult", "TrainingDiverged", "train", "World",
    "DataConfig", "ModelConfig", "PruneConfig", "RunConfig", "ThroughoutConfig",
]
__version__ = "0.2.0"
