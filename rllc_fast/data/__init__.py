"""Data for LLC estimation: minibatch schedules and model-as-distribution data."""
from .model_distribution import ModelDistribution
from .schedule import BatchSchedule

__all__ = ["BatchSchedule", "ModelDistribution"]
