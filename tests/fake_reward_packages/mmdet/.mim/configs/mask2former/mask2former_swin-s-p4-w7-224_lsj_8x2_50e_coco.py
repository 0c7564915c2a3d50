# Fake mmdet 2.x config, where the mmdet wheel keeps its configs (mmdet/.mim/configs/): the GenEval worker finds
# its detector config here when the config names none.
model = dict(type="Mask2Former")
