"""Fake mmdet 2.x: mmdet.apis.init_detector."""
