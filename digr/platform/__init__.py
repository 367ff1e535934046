"""platform: what every stage stands on, and nothing stage-specific.

Owns: typed configs filled from YAML (`config`), local / s3:// storage (`storage`), Ray Train
worker counts (`scaling`), a stage's code key (`codekey`), and the run directory that skips,
resumes and invalidates stages (`runs`).
May import: nothing else from digr (this is the bottom layer).
"""
