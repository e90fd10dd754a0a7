"""The toy world: an offline synthetic world of people, its face models, a base generator trained on it, tiny
test models, and the ablation run on them. It lets the whole chain run and carry signal with no weights and no
network. The product (everything else in umo/) never imports it; it plugs in as an extension (umo.toy.extension).
"""
