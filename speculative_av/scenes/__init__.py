"""Procedurally generated driving scenes with exact boxes: training and test data, no downloads."""
from speculative_av.scenes.generator import CATEGORIES, generate_scene, render_drive, Scene

__all__ = ['CATEGORIES', 'Scene', 'generate_scene', 'render_drive']
