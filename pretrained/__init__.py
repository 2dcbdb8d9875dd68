"""saekit.pretrained"""
