"""Device mesh, logical-axis rules, sharding helpers and multi-host start-up (`distributed`)."""

from flaxattn.parallel.mesh import MESH_AXES, make_mesh, mesh_shape
from flaxattn.parallel.rules import PRESETS, make_rules, unused_mesh_axes
from flaxattn.parallel.sharding import (batch_shardings, create_sharded, global_batch, like_params,
                                        local_rows, param_shardings, path_keys, path_name, replicated,
                                        row_block, to_host)

__all__ = ["MESH_AXES", "PRESETS", "batch_shardings", "create_sharded", "global_batch", "like_params",
           "local_rows", "make_mesh", "make_rules", "mesh_shape", "param_shardings", "path_keys",
           "path_name", "replicated", "row_block", "to_host", "unused_mesh_axes"]
