from ctr.models.ctr_model import CTRModel
from ctr.models.parts import MLP, Dice, FeatureEmbedding, MeanPooling, TargetAttention

__all__ = ["CTRModel", "MLP", "Dice", "FeatureEmbedding", "MeanPooling", "TargetAttention"]
