"""Passes over the step IR: hoist, autodiff, plan."""
