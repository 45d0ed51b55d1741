"""Training: the one Trainer loop, its plugins, losses, optimisers and configuration."""

from everseg.devices import cpu_has_native_bf16
from everseg.learn.config import (ConfigError, DataConfig, EvalConfig, LossConfig, ModelSection,
                                  OptimConfig, RunConfig, TrainConfig, load_config, parse_override)
from everseg.learn.finetune import FrozenBackbone, GradualUnfreeze
from everseg.learn.losses import DiceLoss, LovaszSoftmaxLoss, SegmentationLoss, compute_class_weights
from everseg.learn.plugins import Batch, Plugin, StepOutput
from everseg.learn.run import build_datasets, build_model, train
from everseg.learn.trainer import FitResult, Trainer
from everseg.learn.memory import ReplayMemory
from everseg.learn.strategies import STRATEGIES, Strategy, build_strategies
from everseg.learn.continual import run_scenario
from everseg.learn.online import Observation, OnlineLearner

__all__ = [
    "Batch", "ConfigError", "DataConfig", "DiceLoss", "EvalConfig", "FitResult", "FrozenBackbone",
    "GradualUnfreeze", "LossConfig", "LovaszSoftmaxLoss", "ModelSection", "OptimConfig", "Plugin", "RunConfig",
    "SegmentationLoss", "StepOutput", "TrainConfig", "Trainer", "build_datasets", "build_model",
    "compute_class_weights", "cpu_has_native_bf16", "load_config", "parse_override", "train",
    "ReplayMemory", "STRATEGIES", "Strategy", "build_strategies", "run_scenario", "Observation", "OnlineLearner",
]
