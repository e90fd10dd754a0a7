"""The toy world: a deterministic synthetic-identity world so the whole chain runs offline.

Cartoon people rendered procedurally (NOT real people): `identity` (stable traits), `face` (one face under
one pose/lighting/expression, with exact landmarks and box), `background` and `caption` (scene parts),
`render` (faces, multi-person scenes, portraits), `collection` (a raw image collection laid out like a
user's data, ground truth kept apart), `preview` (contact sheets). `draw` holds the deterministic
anti-aliased drawing primitives they share.
"""

from umo.toy.world.collection import write_raw_collection
from umo.toy.world.identity import Identity, make_identity
from umo.toy.world.render import Scene, render_face, render_portrait, render_scene

__all__ = [
    "Identity",
    "Scene",
    "make_identity",
    "render_face",
    "render_portrait",
    "render_scene",
    "write_raw_collection",
]
