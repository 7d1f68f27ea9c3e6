"""Structural pruning: criteria, LASSO channel selection, variational pruning, surgery."""
from jaxcompress.pruning.criteria import (channel_scores, element_masks, global_counts, keep_counts,
                                          keep_ratio_for_flops, masks_from_scores, prunable_groups)
from jaxcompress.pruning.lasso import lasso_fista, lasso_groups, lasso_prune, least_squares_refit, select_channels
from jaxcompress.pruning.surgery import kept_indices, shrink, without_masks
from jaxcompress.pruning.variational import (VariationalResult, fit_variational, train_variational,
                                             variational_masks, variational_prune)

__all__ = ["channel_scores", "element_masks", "global_counts", "keep_counts", "keep_ratio_for_flops",
           "masks_from_scores", "prunable_groups", "kept_indices", "shrink", "without_masks", "VariationalResult",
           "fit_variational", "train_variational", "variational_masks", "variational_prune", "lasso_fista",
           "lasso_groups", "lasso_prune", "least_squares_refit", "select_channels"]
