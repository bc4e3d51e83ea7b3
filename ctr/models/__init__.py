from ctr.models.ctr_model import CTRModel
from ctr.models.parts import MLP, ConcatPooling, Dice, FeatureEmbedding, MeanPooling, TargetAttention

__all__ = ["CTRModel", "ConcatPooling", "MLP", "Dice", "FeatureEmbedding", "MeanPooling", "TargetAttention"]
