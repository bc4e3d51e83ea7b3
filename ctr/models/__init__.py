from ctr.models.ctr_model import CTRModel
from ctr.models.embedding import FeatureEmbedding
from ctr.models.parts import MLP, ConcatPooling, Dice, MeanPooling, TargetAttention

__all__ = ["CTRModel", "ConcatPooling", "MLP", "Dice", "FeatureEmbedding", "MeanPooling", "TargetAttention"]
